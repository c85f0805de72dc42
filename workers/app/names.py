"""The names of the tasks: what a producer sends and a worker registers, known to both
without either importing the Celery app."""

TASK_ROUTE = "t2iroute.route"
TASK_GENERATE = "t2iroute.generate"
TASK_SCORE = "t2iroute.score"
TASK_SWEEP = "t2iroute.sweep"
TASK_RETRAIN = "t2iroute.retrain"
TASK_CALLBACK = "t2iroute.callback"
