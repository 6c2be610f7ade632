"""The node service: the one long-lived data plane of every Builtin session of a gateway.

``service`` (the supervisor: listeners, placement, the control socket, hand-over to a
successor), ``entry`` (a session as the service holds it), ``workerproc`` (a worker
process as the service sees it), ``worker`` (inside a worker process: one event loop
relaying its connections),
``channel`` (framed messages with descriptors between them), ``client`` (the control
socket's client), ``backend`` (the ``Builtin`` data-server type the control server
drives), ``facility`` (the service as a member of a facility's shared store). The CLI is
``s2ds`` (``scistream.cli.s2ds``).
"""
