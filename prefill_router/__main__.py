import sys

from prefill_router.cli import main

sys.exit(main())
