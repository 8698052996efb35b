"""Webhook notifications (driver side): events built from the job and Ray Train's reports, sent in the background."""
