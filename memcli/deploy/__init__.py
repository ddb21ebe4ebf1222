"""Deployment: the files users ship and their certification. files.py makes them (merged and quantised model,
quantised base under an adapter, ollama Modelfile), certify.py verifies every form in llama.cpp, qat.py trains
against them (`memcli train --deploy`)."""
