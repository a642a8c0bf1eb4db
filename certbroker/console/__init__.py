"""The web console for auditors, hall supervisors and security officers (``certbroker console``).

A client of the broker's gRPC services, never of its database: every page's data is fetched with
the signed-in user's own token, so the broker authorizes each view and writes it to the audit
log. Starlette (:mod:`certbroker.console.app`), server-rendered Jinja2 templates, HTMX and
ECharts served from the package (``static/vendor``, see ``VENDORED.md``).
"""
