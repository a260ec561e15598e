"""Flax backbones (torchvision layout) and weight conversion."""

from tailedcore_jax.models.resnet import ARCHITECTURES
from tailedcore_jax.models.resnet import ResNet
from tailedcore_jax.models.resnet import resnet18
from tailedcore_jax.models.resnet import resnet18_cifar
from tailedcore_jax.models.resnet import resnet34
from tailedcore_jax.models.resnet import resnet50
from tailedcore_jax.models.resnet import resnet101
from tailedcore_jax.models.resnet import wide_resnet50_2
from tailedcore_jax.models.resnet import wide_resnet101_2
from tailedcore_jax.models.batchnorm import recalibrate_batch_norm
