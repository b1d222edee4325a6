import sys

from pretrain_det3d.cli import main

sys.exit(main())
