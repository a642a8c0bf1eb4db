"""``python -m certbroker``: the same command line as the ``certbroker`` script."""

from certbroker.cli.main import main

raise SystemExit(main())
