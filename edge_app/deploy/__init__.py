"""Device bundles (Raspberry Pi kiosk, Android stage): build tooling, never shipped to a device."""
