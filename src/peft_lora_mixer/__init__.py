"""LoRA-Mixer for Hugging Face PEFT: token-routed mixtures of LoRA experts on attention and SSM projections.

Importing this package registers the method with PEFT, so `get_peft_model`, `PeftModel.from_pretrained` and
`AutoPeftModel*` handle `LoraMixerConfig` like any built-in method.
"""

from .config import LoraMixerConfig, LoraMixerPeftType
from .experts.best_expert import best_expert_labels
from .experts.plug_and_play import from_experts
from .experts.sources import ExpertError, hub_options
from .export import export_static_lora, export_static_lora_per_group, mean_gates
from .integrations.collapse import RoutingCollapseWarning
from .integrations.lm_evaluation import evaluate_mixer
from .integrations.trainer import ExpertIdsCollator, RoutingCallback, RoutingLossMixin
from .layer import ExpertSpec, LoraMixerLayer
from .model import LoraMixerModel
from .registration import register
from .routing_loss.loss import RoutingLoss
from .routing_loss.stats import ModuleRoutingStats
from .targets import DEFAULT_TARGET_MODULES

register()

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ExpertError",
    "ExpertIdsCollator",
    "ExpertSpec",
    "LoraMixerConfig",
    "LoraMixerLayer",
    "LoraMixerModel",
    "LoraMixerPeftType",
    "ModuleRoutingStats",
    "RoutingCallback",
    "RoutingCollapseWarning",
    "RoutingLoss",
    "RoutingLossMixin",
    "best_expert_labels",
    "evaluate_mixer",
    "export_static_lora",
    "export_static_lora_per_group",
    "from_experts",
    "hub_options",
    "mean_gates",
    "register",
]
