"""`voice-agent eval`: is my agent good? Suites of audio cases, figures, reports."""
