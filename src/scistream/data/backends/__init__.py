"""Data servers that run a stock proxy binary: HAProxy, nginx (stream module), stunnel.

Each backend writes a configuration per session into ``spec.workdir``, runs the Debian
package's binary in the foreground in its own process group (log in the workdir),
returns from ``start()`` only once every listener is bound by that process, reloads in
place on ``retarget()``, and stops the whole process group on ``stop()``.
``common`` holds what they share (finding the binary, the listener check, process-group
clean-up, re-adoption). stunnel runs behind ``stunnel_relay``, our relay in front of its
plain sides (the process supervised for it, stunnel its child), which carries half-closed
streams whole.

    from scistream.data.base import get_backend
    server = get_backend("Haproxy")(spec)    # or "Nginx", "Stunnel"
    await server.start()
"""
