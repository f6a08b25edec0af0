"""``python -m dmlp_plugin`` is the ``dmlp`` command."""

import sys

from dmlp_plugin.cli import main

sys.exit(main())
