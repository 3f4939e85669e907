"""Plain-text e-mail templates: a job names one and gives its variables."""

from __future__ import annotations

from email.message import EmailMessage
from string import Template

from bridge.email_queue import BadJob, EmailJob

TEMPLATES: dict[str, str] = {
    "verify_email": (
        "Hello $full_name,\n\n"
        "please confirm your e-mail address by opening this link:\n\n"
        "$verify_url\n\n"
        "The link is valid for $valid_hours hours. If you did not create an account, "
        "ignore this message.\n"
    ),
}


def render(job: EmailJob, *, sender: str) -> EmailMessage:
    """The message for ``job`` from ``sender``.

    Raises:
        BadJob: unknown template or a missing variable (retrying will not help).
    """
    template = TEMPLATES.get(job.template)
    if template is None:
        raise BadJob(f"unknown e-mail template {job.template!r}")
    try:
        body = Template(template).substitute(job.variables)
    except (KeyError, ValueError) as error:
        raise BadJob(f"template {job.template!r} is missing variable {error}") from None
    message = EmailMessage()
    message["From"] = sender
    message["To"] = job.to
    message["Subject"] = job.subject
    message["Message-ID"] = f"<{job.job_id}@notification-hub>"
    message.set_content(body)
    return message
