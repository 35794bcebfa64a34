"""Downstream tasks, one module per kind behind :class:`finetune.tasks.base.Task` (see its docstring).

Importing this package registers every kind: classification (linear probe / fine-tuning), segmentation,
change, fusion, cross_sensor (train on one sensor, test on another of the same places).
"""

from finetune.tasks.base import Task, TaskResult, kinds, run_task, seed_everything, task_class, train_loop
from finetune.tasks.change import ChangeTask
from finetune.tasks.classification import ClassificationTask, stratified_split
from finetune.tasks.crosssensor import CrossSensorTask
from finetune.tasks.fusion import FusionTask
from finetune.tasks.segmentation import SegmentationTask

__all__ = ["ChangeTask", "ClassificationTask", "CrossSensorTask", "FusionTask", "SegmentationTask", "Task", "TaskResult", "kinds",
           "run_task", "seed_everything", "stratified_split", "task_class", "train_loop"]
