"""webhooks - applications told what became of their messages (``webhooks.*``).

- `events`: which events there are, what their payloads carry (ids, recipient,
  status, mode, TLS - never a subject or a body), which endpoint wants which, and
  the Standard Webhooks signature;
- `outbox`: the durable outbox in the queue's database: the queue's events are
  written in the same transaction as the state they report (a crash loses none),
  shared by the nodes of a cluster;
- `dispatcher`: posts each endpoint its events, a message's in order, retried on
  ``webhooks.retry_schedule`` until ``webhooks.max_age``, then dropped with a record.
"""

# seconds between the dispatcher's rounds, and the shortest time between two
# wake-ups of the webhook process (here: the SMTP workers import no more than this)
ROUND_GAP = 0.05
