"""Entry point of ``python -m gs_lightning``."""

from gs_lightning.cli import main

if __name__ == "__main__":
    main()
