"""triaxis: PyTorch-native training of large language models.

The package layout follows the data flow of a run:
config -> parallel (mesh) -> model -> parallel (parallelize) -> data -> train (loop)
-> checkpoint -> metrics.
"""

__version__ = "0.1.0"
