"""What the tests share: real servers and the clients that talk to them, by subject.

``servers`` (the in-process server, ``python run.py`` processes, free ports),
``upstream`` (the fake upstream's view and its faults), ``http``, ``websocket``,
``grpc`` (the clients of each protocol), ``openai_sdk`` (the official OpenAI SDK
pointed at ``/v1``), ``database`` (the SQLite file),
``postgres`` (schemas on the local PostgreSQL), ``keys`` (the admin key and API,
waiting for a change of the stored keys), ``limits`` (a clock the tests move under a
server's windows and budgets), ``logs`` (the log-leak watch,
access lines, metrics) and ``waiting`` (bounded polling). Fixtures live in
``tests/conftest.py`` only; test modules import from here, never from each other.
"""
