import sys

from pccl_py.cli.main import main

sys.exit(main())
