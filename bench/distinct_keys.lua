-- wrk script for bench/soak.py: every request has a key, a model and (every other one) a path
-- never seen before, so each one could leave state behind.
local counter = 0
math.randomseed(os.time())
local salt = math.random(1, 1000000000)

request = function()
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = string.format("Bearer sk-soak-%d-%d-abcdefgh", salt, counter),
  }
  if counter % 2 == 0 then
    return wrk.format("GET", string.format("/v1/files/file-%d-%d/content", salt, counter), headers)
  end
  local body = string.format(
    '{"model":"model-%d-%d","messages":[{"role":"user","content":"soak %d"}]}',
    salt, counter, counter)
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end
