"""Judging frozen encoders: weighted kNN, cluster agreement, few-shot episodes, linear probe and
VOC07-style low-shot SVMs.

Every function takes features (numpy arrays or tensors) and labels and returns plain numbers or a
small result dataclass; accuracies are in percent (0-100). A search measures them on the ``val``
split; the ``test`` split is for the final table of chosen configurations only.

==============  ===============================================================
``knn.py``      :func:`knn_accuracy`, :func:`cluster_agreement`, :func:`raw_pixel_features`
``fewshot.py``  :func:`fewshot_episodes` (N-way K-shot, logistic or prototype classifier)
``linear.py``   :func:`linear_probe` (logistic regression, regularisation chosen on val)
``voc07.py``    :func:`voc07_lowshot` (per-class linear SVMs, k positives per class, mAP)
``encoder.py``  :func:`load_encoder` (checkpoint or random init), :func:`extract_features`
``semi.py``     :func:`semi_supervised` (fine-tune on a class-balanced label fraction)
``cli.py``      ``python -m pcl_tune.evaluate``
==============  ===============================================================
"""

from .encoder import EvaluationError, LoadedEncoder, extract_features, load_encoder
from .fewshot import FewShotResult, fewshot_episodes
from .knn import cluster_agreement, knn_accuracy, knn_predict, raw_pixel_features
from .linear import LinearProbeResult, linear_probe
from .semi import SemiResult, balanced_subset, semi_supervised
from .voc07 import voc07_lowshot

__all__ = ["EvaluationError", "FewShotResult", "LinearProbeResult", "LoadedEncoder", "SemiResult", "balanced_subset",
           "cluster_agreement", "extract_features", "fewshot_episodes", "knn_accuracy", "knn_predict", "linear_probe",
           "load_encoder", "raw_pixel_features", "semi_supervised", "voc07_lowshot"]
