"""tlsrpt - SMTP TLS Reporting (RFC 8460): what the recipient domains that publish
MTA-STS or DANE learn of our sessions with their servers.

- `model`: the result types, the policies a session is counted under, the tally
  kept in memory by delivery, and the report (JSON, and the mail it travels in);
- `store`: the counts and the reports sent, in the queue's database (shared by the
  nodes of a cluster: one report per domain and day, whichever node sends it);
- `service`: counting during delivery, and once a day sending each domain its
  report to the ``rua`` of its ``_smtp._tls`` record (``mailto:`` through the
  gateway's own queue, ``https:`` by POST), every report archived.
"""
