"""`icd serve`: one process holds a model and answers the requests of every `icd` command of the same user on a
Unix socket, so that a shell loop pays the model's start-up once. `sockets` (where servers listen), `wire`
(the framing), `scheduler` (the queue, batching and workers), `front` (the socket front end: connections,
handshake, status) and `client` (what commands use)."""
