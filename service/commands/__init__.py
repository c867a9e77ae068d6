"""The command line's commands, one module each holding its parser and its runner:
:mod:`~service.commands.serve` (the default), :mod:`~service.commands.export_openapi`,
:mod:`~service.commands.explain` and :mod:`~service.commands.evaluate` (on local files, with
:mod:`service.local`); ``ray``'s is :mod:`service.ray_serve.command`, next to the Ray code it
runs. What they share is :mod:`~service.commands.common`. Each exposes ``add_parser(commands)``
and ``run(args, argv)``; :mod:`service.cli` registers and dispatches them.

Nothing below the command line (engine, runtime, API, local) imports these modules.
"""
