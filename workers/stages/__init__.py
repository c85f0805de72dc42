"""The work of each step as plain functions over a session, one module per step (route,
generate, score, give_up; callbacks for the callback stage): the Celery tasks only parse,
call these, commit and hand on. Every write is idempotent, so a redelivered task that
finds its row does nothing twice. Each function returns the steps it newly made necessary;
the caller sends them after its transaction commits (``workers.app.flow``)."""

from workers.stages.common import Key, Outcome, RequestGone
from workers.stages.generate import NewImage, complete_generations, generation_jobs, render
from workers.stages.give_up import give_up
from workers.stages.route import route_requests
from workers.stages.score import Escalation, score_images

__all__ = [
    "Escalation",
    "Key",
    "NewImage",
    "Outcome",
    "RequestGone",
    "complete_generations",
    "generation_jobs",
    "give_up",
    "render",
    "route_requests",
    "score_images",
]
