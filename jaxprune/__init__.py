"""jaxprune: sparsity and quantization research as drop-in Optax transforms."""

from jaxprune.schedules import constant_schedule, one_shot_schedule, polynomial_schedule

__version__ = "0.1.0"
