"""pcl_tune: hyperparameter search for Prototypical Contrastive Learning on Ray Tune."""

__version__ = "0.1.0"
