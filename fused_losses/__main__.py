"""``python -m fused_losses``: environment, self-check and quick benchmark (see fused_losses.cli)."""

from fused_losses.cli import main

raise SystemExit(main())
