"""``python -m service``: the ``gradcam-service`` command."""

import sys

from service.cli import main

sys.exit(main())
