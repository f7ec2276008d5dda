"""Where `triaxis launch` runs a job (triaxis/launch.py dispatches on --backend):

torchrun.py          this node: standalone or one node of a c10d rendezvous (all backends
                     end here, on the nodes)
slurm.py             an sbatch script: srun one launcher per node, requeue + auto-resume
sagemaker.py         a CreateTrainingJob request, validated offline, submitted with boto3
sagemaker_entry.py   inside a SageMaker job: its environment -> rendezvous, data, checkpoints
netenv.py            network facts (interfaces, routes, EFA) and the environment NCCL,
                     gloo and libfabric need, set by the launcher (and shown by `triaxis net`)
"""
