"""seqio task and mixture registrations; importing this package registers them (once)."""

from tasks import tfds_tasks

if "wmt14_ende" not in __import__("seqio").TaskRegistry.names():
  tfds_tasks.register()
