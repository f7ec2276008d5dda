from triaxis.cli import main

raise SystemExit(main())
