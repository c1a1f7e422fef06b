"""The end of a study seen from one machine (README, "Many machines"): its workers are done, the study is
short of ``n_trials``. Retries waiting for a worker get one (:meth:`StudyEnd.take_waiting`); trials other
machines still train are waited for, the stale ones reaped (:meth:`StudyEnd.held_elsewhere`).

Before this a machine that ended here reported the study complete, wrote the best trial's params while one
still trained elsewhere (MLflow params cannot change after), closed the shared parent run, and left a lost
machine's trials to nobody (found by a walkthrough running the README's "same command" on two machines).
"""

from __future__ import annotations

from typing import Any

from pipeline.sweep.study import has_waiting

WAIT_S = 5.0  # between two looks at trials running elsewhere (each reaps under the budget lock)


class StudyEnd:
    """What one machine's supervisor knows of the end of its study, and says once."""

    def __init__(self, n_trials: int):
        self.waiting_said = False  # said that this machine waits for trials elsewhere
        self.untold_said = False  # said that trials elsewhere cannot be checked
        self.elsewhere = False  # trials of the study ran elsewhere once this machine's workers ended
        self.takeovers = n_trials  # workers started for a lost machine's retries (each retried once)

    def take_waiting(self, sup: Any) -> bool:
        """A WAITING trial (a retry enqueued after this machine's workers ended) and budget for it: one
        worker to train it. Paid from the supervisor's replacement budget (``respawns``); once this
        machine has seen trials run elsewhere, a lost machine's retries are paid from ``takeovers`` (each
        trial is retried once: finite), so a crash budget spent earlier does not leave them WAITING."""
        if sup.budget_left() <= 0 or not has_waiting(sup.stores.study):
            return False
        if sup.respawns > 0:
            sup.respawns -= 1
        elif self.elsewhere and self.takeovers > 0:
            self.takeovers -= 1
        else:
            return False
        sup.workers.spawn(0)
        return True

    def held_elsewhere(self, sup: Any) -> bool:
        """Trials of the study still run in other processes: wait (``WAIT_S``) for those whose liveness
        can be told (alive on this host; on another host of a database store, whose heartbeat reaps them
        after ``grace`` when they die), after reaping the stale ones, whose retries a worker of this machine
        takes next (:meth:`take_waiting`). A trial held on another host of a journal store cannot be told
        (no heartbeat): it is named in one line and not waited for. False: nothing to wait for."""
        from optuna.trial import TrialState

        from pipeline.provenance import owner_alive
        from pipeline.sweep.owners import reap_stale
        from pipeline.sweep.stores import budget_lock
        from pipeline.uris import is_rdb

        s = sup.stores
        # this machine's workers have ended: a trial running now is another machine's (or a dead worker's)
        self.elsewhere = self.elsewhere or bool(
            s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        )
        with budget_lock(s.url, s.storage, sup.sw.study):
            reap_stale(s.study, s.url, s.mlflow_uri)
        if sup.reached():
            return False
        running = s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:  # a retry of a lost machine's trial: this machine's next worker takes it
            can_pay = sup.respawns > 0 or (self.elsewhere and self.takeovers > 0)
            return has_waiting(s.study) and sup.budget_left() > 0 and can_pay

        def told(t) -> bool:  # alive on this host, or on another with a heartbeat; no owner yet: reaped soon
            owner = t.user_attrs.get("worker")
            alive = owner_alive(owner, one_machine=not is_rdb(s.url)) if owner else True
            return alive is True or (alive is None and is_rdb(s.url))

        waited = [t for t in running if told(t)]
        if not waited:
            if not self.untold_said:
                self.untold_said = True
                owners = sorted({str(t.user_attrs.get("worker")).split("|")[0] for t in running})
                print(
                    f"sweep {sup.sw.study}: {len(running)} trial(s) still running on {', '.join(owners)}, "
                    "which this machine cannot check (a journal store has no heartbeat): not waiting",
                    file=sup.out,
                    flush=True,
                )
            return False
        if not self.waiting_said:
            self.waiting_said = True
            print(
                f"sweep {sup.sw.study}: this machine's workers are done; waiting for {len(waited)} "
                "trial(s) running in other processes (Ctrl-C leaves them to their workers)",
                file=sup.out,
                flush=True,
            )
        sup.workers.wait_any(WAIT_S)
        return True
