"""Commands on local files, in process, without a server: ``gradcam-service explain`` and
``gradcam-service evaluate``. They use the engine directly, with the models the server would
serve (the same ``GRADCAM_*`` settings and models file). Their parsers and options are
:mod:`service.commands`."""
