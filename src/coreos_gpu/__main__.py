from coreos_gpu.cli import main

raise SystemExit(main())
