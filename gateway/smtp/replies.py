"""The closed catalogue of SMTP replies Sealgate sends (RFC 5321, RFC 3463 codes).

Handlers return one of these; no reply text is written anywhere else.  Replies never
contain message content; the only variable parts are our host name, queue ids,
limits and the client's own address or recipient.
"""

from __future__ import annotations

import re

OK = "250 2.0.0 OK"
HELO_OK = "250 {hostname}"  # HELO and EHLO replies carry no enhanced code (RFC 2034 3)
EHLO_LAST = "250 HELP"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
SYNTAX_DATA = "501 5.5.4 Syntax: DATA"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"

TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
RELAY_DENIED = "554 5.7.1 <{address}>: Relay access denied"
SENDER_NOT_ALLOWED = "550 5.7.1 <{address}>: Sender address not allowed to relay here"
SENDER_NOT_OWNED = "550 5.7.1 <{address}>: Sender address not owned by the authenticated user"
NOT_BOUND = "550 5.7.1 Message refused: {detail}"
BINDING_TEMPFAIL = "451 4.4.3 Cannot fetch the DKIM key to check the message, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients (limit {limit} per message)"
SIZE_EXCEEDED_MAIL = "552 5.3.4 Message size exceeds fixed limit of {limit} bytes"
MESSAGE_TOO_BIG = "552 5.3.4 Message too big for system (limit {limit} bytes)"
LINE_TOO_LONG = "500 5.5.2 Line too long in message data (limit {limit} octets, RFC 5321 4.5.3.1.6)"
BARE_LINE_ENDING = (
    "554 5.5.2 Bare CR or LF in message data; lines must end with CRLF (RFC 5321 2.3.8)"
)
MAIL_LOOP = "554 5.4.6 Too many Received headers ({count}): mail loop suspected"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage, try again later"
SPOOL_ERROR = "451 4.3.0 Temporary queue error, try again later"
SYNTAX_SIZE = "501 5.5.4 Syntax error in SIZE parameter"
BAD_PARAMETER = "501 5.5.4 ESMTP parameters must be printable ASCII"
BAD_EXTENSION_PARAMETER = "501 5.5.4 Invalid parameter: {detail}"
REQUIRETLS_WITHOUT_TLS = "530 5.7.10 REQUIRETLS needs a TLS session: STARTTLS first"
BAD_SENDER = "501 5.1.7 Bad sender address syntax: {detail}"
BAD_RECIPIENT = "553 5.1.3 Bad recipient address syntax: {detail}"
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter (RFC 6531)"
BAD_HELO = "501 5.5.2 Invalid HELO/EHLO name: {detail}"
TLS_ACTIVE = "503 5.5.1 TLS already active (RFC 3207)"
COMMAND_TOO_LONG = "500 5.5.2 Line too long"
NEED_RCPT = "503 5.5.1 Need RCPT command"

TOO_MANY_CONNECTIONS = "421 4.7.0 {hostname} Too many connections, try again later"
TOO_MANY_FROM_IP = "421 4.7.0 {hostname} Too many connections from your address"
TIMEOUT = "421 4.4.2 {hostname} Error: timeout exceeded"
SHUTTING_DOWN = "421 4.3.2 {hostname} Service shutting down, try again later"

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_TOO_MANY = "421 4.7.0 {hostname} Too many failed authentication attempts"
AUTH_THROTTLED = "454 4.7.0 Too many failed authentication attempts, try again later"
AUTH_NOT_AVAILABLE = "504 5.5.4 Unrecognized authentication type"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"


# Replies aiosmtpd writes itself ("250 OK", "500 Error: bad syntax", "503 Error: nested
# MAIL command"...) get an enhanced status code too, since we advertise
# ENHANCEDSTATUSCODES (RFC 2034: every reply but the greeting and HELO/EHLO).
_HAS_ENHANCED = re.compile(rb"[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_DETAIL = {
    b"221": b"2.0.0",
    b"250": b"2.0.0",
    b"252": b"2.5.0",
    b"421": b"4.3.0",
    b"451": b"4.3.0",
    b"454": b"4.7.0",
    b"500": b"5.5.2",
    b"501": b"5.5.4",
    b"502": b"5.5.1",
    b"503": b"5.5.1",
    b"504": b"5.5.4",
    b"530": b"5.7.0",
    b"553": b"5.1.3",
    b"554": b"5.7.0",
    b"555": b"5.5.4",
}
_INTERMEDIATE = (b"220", b"334", b"354")  # STARTTLS go-ahead, AUTH challenge, DATA


def with_enhanced_code(line: bytes) -> bytes:
    code = line[:3]
    if code in _INTERMEDIATE or not code.isdigit() or _HAS_ENHANCED.match(line):
        return line
    detail = _DEFAULT_DETAIL.get(code, code[:1] + b".0.0")
    return code + line[3:4] + detail + (b" " + line[4:] if len(line) > 4 else b"")
