"""structlab: structured linear layers under Hydra + Lightning."""

__version__ = "0.1.0"
