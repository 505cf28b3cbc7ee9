"""The catalogue of event names, shared by the structured log and the metrics.

Every log line Sealgate writes has one of these names as its ``event``; tests and
dashboards rely on them, so they change only with a note in the changelog.
"""

from __future__ import annotations

import enum


class Event(enum.StrEnum):
    # lifecycle
    STARTING = "app.starting"
    READY = "app.ready"
    STOPPING = "app.stopping"
    STOPPED = "app.stopped"
    RELOADED = "app.reloaded"
    RELOAD_FAILED = "app.reload-failed"
    CONFIG_WARNING = "app.config-warning"
    CERT_GENERATED = "tls.self-signed-generated"
    WORKER_EXITED = "smtp.worker-exited"
    # a worker's message handed over wrongly: read from the spool instead, or (the
    # line's framing lost) the worker restarted
    WORKER_HANDOVER_INVALID = "smtp.worker-handover-invalid"
    # spool
    SPOOL_RECOVERED = "spool.recovered"
    SPOOL_INCOMPLETE_REMOVED = "spool.incomplete-removed"
    SPOOL_CORRUPT = "spool.corrupt-quarantined"
    SPOOL_WRITE_FAILED = "spool.write-failed"
    # smtp
    CONNECTION_REFUSED = "smtp.connection-refused"
    MESSAGE_ACCEPTED = "smtp.message-accepted"
    MESSAGE_REJECTED = "smtp.message-rejected"
    RELAY_DENIED = "smtp.relay-denied"
    SENDER_REFUSED = "smtp.sender-refused"
    BINDING_REFUSED = "smtp.binding-refused"
    AUTH_FAILED = "smtp.auth-failed"
    AUTH_SUCCEEDED = "smtp.auth-succeeded"
    AUTH_THROTTLED = "smtp.auth-throttled"
    TIMEOUT = "smtp.timeout"
    TLS_FAILED = "smtp.tls-failed"
    SESSION_ERROR = "smtp.session-error"
    CONNECTION_LOST = "smtp.connection-lost"
    # queue and delivery
    QUEUE_STARTED = "queue.started"
    QUEUE_STRAYS_ADOPTED = "queue.strays-adopted"
    QUEUE_FORGOTTEN_SET_ASIDE = "queue.forgotten-set-aside"
    DELIVERY_ATTEMPT = "delivery.attempt"
    DELIVERY_ERROR = "delivery.error"
    DELIVERY_TLS_FAILED = "delivery.tls-failed"
    DESTINATION_SUSPENDED = "delivery.destination-suspended"
    DELIVERY_STALLED = "delivery.attempt-stalled"
    DSN_SENT = "delivery.dsn-sent"
    ENCRYPTION_FAILED = "delivery.encryption-failed"
    DKIM_NOT_SIGNED = "delivery.dkim-not-signed"
    MESSAGE_DONE = "queue.message-done"
    MESSAGE_QUARANTINED = "queue.message-quarantined"
    QUEUE_STORE_FAILED = "queue.store-failed"
    CLUSTER_TAKEOVER = "cluster.takeover"
    TLSRPT_SENT = "tlsrpt.report-sent"
    TLSRPT_FAILED = "tlsrpt.report-failed"
    TLSRPT_ERROR = "tlsrpt.error"
    API_REQUEST = "api.request"
    WEBHOOK_DROPPED = "webhook.dropped"
    WEBHOOK_ERROR = "webhook.error"
    WEBHOOK_PIPELINING_OFF = "webhook.pipelining-off"
    # archive
    ARCHIVE_KEY_GENERATED = "archive.key-generated"
    ARCHIVE_RECOVERED = "archive.recovered"
    ARCHIVE_ADOPTED = "archive.adopted"
    ARCHIVE_UNFINISHED = "archive.unfinished-removed"
    ARCHIVE_ERROR = "archive.error"
    ARCHIVE_NOT_REMOVED = "archive.spool-file-kept"
    ARCHIVE_ACCESS = "archive.access"
    # compliance console
    CONSOLE_SIGNIN = "console.signin"
    CONSOLE_ERROR = "console.error"
    # portal
    PORTAL_DEPOSITED = "portal.deposited"
    PORTAL_ACCESS = "portal.access"
    PORTAL_SWEEP_FAILED = "portal.sweep-failed"
    PORTAL_BAD_REQUEST = "portal.bad-request"
    PORTAL_ERROR = "portal.error"
    PORTAL_OIDC_FAILED = "portal.oidc-failed"
    # ops http
    HTTP_ERROR = "http.error"
    # the HTTPS API listener
    API_BAD_REQUEST = "api.bad-request"
    API_ERROR = "api.error"


class RejectReason(enum.StrEnum):
    """Why a command or message was refused: the ``reason`` label of the metrics."""

    TLS_REQUIRED = "tls_required"
    RELAY_DENIED = "relay_denied"
    # the tenant and sender binding (gateway.smtp.binding)
    SENDER_DOMAIN = "sender_domain"
    SENDER_NOT_OWNED = "sender_not_owned"
    TENANT_ID = "tenant_id"
    DKIM_UNBOUND = "dkim_unbound"
    DKIM_TEMPFAIL = "dkim_tempfail"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    MESSAGE_TOO_BIG = "message_too_big"
    LINE_TOO_LONG = "line_too_long"
    BARE_LINE_ENDING = "bare_line_ending"
    MAIL_LOOP = "mail_loop"
    SPOOL_ERROR = "spool_error"
    BAD_SYNTAX = "bad_syntax"
    CONNECTION_LIMIT = "connection_limit"
    AUTH_FAILED = "auth_failed"
    TIMEOUT = "timeout"
    TLS_HANDSHAKE = "tls_handshake_failed"


class TlsFailure(enum.StrEnum):
    """Why TLS with a recipient's server failed: the ``reason`` label of the metrics."""

    NOT_OFFERED = "starttls_not_offered"
    HANDSHAKE = "handshake_failed"
    UNTRUSTED = "certificate_untrusted"
    NAME_MISMATCH = "certificate_name_mismatch"
    EXPIRED = "certificate_expired"
    DANE_MISMATCH = "dane_mismatch"


class EncryptionFailure(enum.StrEnum):
    """Why a copy could not be encrypted: the ``reason`` label of the metrics."""

    KEY_MISSING = "key_missing"  # no key any more (removed since the decision)
    KEY_INVALID = "key_invalid"  # expired, or no longer passes the checks
    ENCRYPT_FAILED = "encrypt_failed"
