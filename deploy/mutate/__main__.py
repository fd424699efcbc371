import sys

from deploy.mutate import main

sys.exit(main())
