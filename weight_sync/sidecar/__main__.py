import sys

from weight_sync.sidecar.cli import main

sys.exit(main())
