"""Job notifications: an outbox of deliveries, signed per Standard Webhooks, sent by workers."""
