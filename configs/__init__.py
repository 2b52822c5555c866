"""Shipped Hydra configs, installed as the package vpop.configs (read as pkg://vpop.configs)."""
