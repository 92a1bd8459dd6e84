from vitlab.models.cost import count_parameters, flops_per_image
from vitlab.models.simple_vit import SimpleViT, posemb_sincos_2d

__all__ = ["SimpleViT", "count_parameters", "flops_per_image", "posemb_sincos_2d"]
