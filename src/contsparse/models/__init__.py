"""Model registry: ``build_model(name, input_shape, num_classes)``; bring your own ``nn.Module`` too."""

from contsparse.models import conv, lenet, resnet, vgg  # noqa: F401  (registers the models)
from contsparse.models.registry import available_models, build_model, model_spec, register_model

__all__ = ["available_models", "build_model", "model_spec", "register_model"]
