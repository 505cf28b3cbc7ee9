"""Facts about recipients' domains and mail servers: DNS, and later STARTTLS, MTA-STS,
DANE and known keys."""
