"""tailedcore_jax: TailedCore and NAN as pure, jit-compiled JAX functions.

Every public numeric function is re-exported here, one name per line; ``docs/design.md`` maps
each paper step to its module and function. Host-side modules (``data``, ``checkpoint``,
``models.convert``) are imported on demand; the experiments live in the ``experiments`` package.

References:
    TailedCore: Jung et al., CVPR 2025 (arXiv 2504.02775), code jungyg/TailedCore.
    NAN: Park et al., "Understanding the Feature Norm for Out-of-Distribution Detection",
    ICCV 2023 (arXiv 2310.05316).
"""

__version__ = "0.1.0"

# knn
from tailedcore_jax.knn import NeighborResult
from tailedcore_jax.knn import nearest_neighbors
from tailedcore_jax.knn import pairwise_sq_distances
from tailedcore_jax.knn import sq_norms

# coreset
from tailedcore_jax.coreset import CoresetSelection
from tailedcore_jax.coreset import greedy_coreset
from tailedcore_jax.coreset import greedy_coreset_masked
from tailedcore_jax.coreset import random_projection

# lof
from tailedcore_jax.lof import local_outlier_factor
from tailedcore_jax.lof import lof_filter_mask
from tailedcore_jax.lof import patchwise_lof

# tailsampler (in the paper's step order)
from tailedcore_jax.tailsampler import cosine_similarity_matrix
from tailedcore_jax.tailsampler import trim_min_thresholds
from tailedcore_jax.tailsampler import predict_class_sizes
from tailedcore_jax.tailsampler import group_class_sizes
from tailedcore_jax.tailsampler import elbow
from tailedcore_jax.tailsampler import max_k_within_percentile
from tailedcore_jax.tailsampler import few_shot_threshold
from tailedcore_jax.tailsampler import TailSamplerStatistics
from tailedcore_jax.tailsampler import tail_sampler_statistics
from tailedcore_jax.tailsampler import tail_sample_mask

# features / augment / anomaly_map
from tailedcore_jax.features import adaptive_avg_pool1d
from tailedcore_jax.features import extract_features
from tailedcore_jax.features import image_embedding
from tailedcore_jax.features import make_feature_extractor
from tailedcore_jax.features import patchcore_features
from tailedcore_jax.augment import padding_for_rotation
from tailedcore_jax.augment import rotate_flip
from tailedcore_jax.augment import tail_augmentation_params
from tailedcore_jax.augment import tail_augmentations
from tailedcore_jax.anomaly_map import anomaly_maps

# memory (the paper steps and the models)
from tailedcore_jax.memory import CoresetRows
from tailedcore_jax.memory import MemoryBank
from tailedcore_jax.memory import coreset_capacity
from tailedcore_jax.memory import coreset_rows
from tailedcore_jax.memory import denoised_coreset
from tailedcore_jax.memory import fit_patchcore
from tailedcore_jax.memory import fit_softpatch
from tailedcore_jax.memory import fit_tailedcore
from tailedcore_jax.memory import lof_scores
from tailedcore_jax.memory import nan_normalized_scores
from tailedcore_jax.memory import score
from tailedcore_jax.memory import tail_rows

# sharding (mesh helpers; every kernel takes mesh=)
from tailedcore_jax.sharding import mesh_size

# ood
from tailedcore_jax.ood import MahalanobisModel
from tailedcore_jax.ood import SSDModel
from tailedcore_jax.ood import activation_entropy
from tailedcore_jax.ood import combine_distance_nan
from tailedcore_jax.ood import energy
from tailedcore_jax.ood import feature_norm
from tailedcore_jax.ood import global_avg_pool
from tailedcore_jax.ood import kl_uniform
from tailedcore_jax.ood import knn_ood_distance
from tailedcore_jax.ood import knn_ood_score
from tailedcore_jax.ood import mahalanobis_fit
from tailedcore_jax.ood import mahalanobis_score
from tailedcore_jax.ood import max_logit
from tailedcore_jax.ood import msp
from tailedcore_jax.ood import nan_knn_score
from tailedcore_jax.ood import nan_react_knn_score
from tailedcore_jax.ood import nan_react_score
from tailedcore_jax.ood import nan_react_ssd_score
from tailedcore_jax.ood import nan_ssd_score
from tailedcore_jax.ood import negative_aware_norm
from tailedcore_jax.ood import positive_count
from tailedcore_jax.ood import react_clip
from tailedcore_jax.ood import react_threshold
from tailedcore_jax.ood import ssd_distance
from tailedcore_jax.ood import ssd_fit
from tailedcore_jax.ood import ssd_score

# metrics
from tailedcore_jax.metrics import aupr
from tailedcore_jax.metrics import aupro
from tailedcore_jax.metrics import auroc
from tailedcore_jax.metrics import f1_max
from tailedcore_jax.metrics import fpr_at_tpr
from tailedcore_jax.metrics import minmax_normalize
from tailedcore_jax.metrics import pixel_auroc
from tailedcore_jax.metrics import pro_curve
