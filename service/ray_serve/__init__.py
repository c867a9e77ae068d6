"""The service on Ray Serve: the same FastAPI app and runtime, N replicas.

- :mod:`~service.ray_serve.options`: what Serve is told (replicas, autoscaling, resources,
  request limits), derived from :class:`~service.settings.Settings`; imports no Ray;
- :mod:`~service.ray_serve.deployment`: the deployment, one replica = one runtime with its
  models behind the service's own app (``@serve.ingress``), and the application builder that
  Serve config files name;
- :mod:`~service.ray_serve.command`: ``gradcam-service ray``, a local Ray on loopback or the
  cluster in ``RAY_ADDRESS``.

Only the last two import Ray (the ``ray`` extra); the plain server never does.
"""
