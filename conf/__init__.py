"""vitlab's Hydra configs, shipped as package data (``pkg://vitlab.conf``)."""
