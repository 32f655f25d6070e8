"""slimkern behind Flower (flwr 1.41, Message API; ``pip install slimkern[flower]``).

* ``slimkern.fl.flower.strategy.SlimkernStrategy``: a Flower ``Strategy`` running any slimkern
  rule through the transport-free round object ``slimkern.fl.server.Server``;
* ``slimkern.fl.flower.apps``: the ``server_app`` (``ServerApp``) and ``client_app``
  (``ClientApp``, the same client function ``simulate`` runs, on partition
  ``node_config["partition-id"]``);
* ``slimkern.fl.flower.codec``: tasks and replies as Flower records, wire bytes;
* ``slimkern.fl.flower.config``: the run configuration both apps read;
* ``slimkern.fl.flower.generate``: ``slimkern fl --engine flower --out app/`` writes a runnable app.

Deployment (one machine or several, TLS): ``docs/flower.md``. Flower is imported only by
``strategy`` and ``apps``; the rest works without it.
"""
