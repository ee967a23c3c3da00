"""st-viomni: viOmniQwen unified multimodal embeddings as a sentence-transformers plugin."""

from .deferred_pixels import DeferredPixelCollator
from .formatting import CHAT_TEMPLATE, format_input, load_image
from .inputs import check_inputs
from .model import ViOmniQwen, build_model
from .tasks import PREFIXES, TASK_NAMES, TASKS, Task, get_task

__all__ = [
    "CHAT_TEMPLATE",
    "DeferredPixelCollator",
    "PREFIXES",
    "TASKS",
    "TASK_NAMES",
    "Task",
    "ViOmniQwen",
    "build_model",
    "check_inputs",
    "format_input",
    "get_task",
    "load_image",
]
