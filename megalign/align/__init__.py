"""The native-alignment pipeline stages."""
