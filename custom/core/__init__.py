"""The BraTS domain core: file naming and channels, label schemes and regions, errors, atomic writes, locks, the
runtime (bundle folder, device) and process ranks. It imports nothing else of ``custom``; everything else imports it."""
