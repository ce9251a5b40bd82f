"""Guest laboratory: builds busybox guests, boots them under QEMU/TCG, captures their memory."""
