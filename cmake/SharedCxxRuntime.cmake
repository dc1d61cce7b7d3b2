# NOTE: dgemma._C is loaded into a process that already runs torch's shared C++ runtime (libstdc++.so.6,
# libgcc_s.so.1). A module carrying its own static copy has a second set of iostream/locale and
# exception-handling state, and formatting an error message or throwing through it crashes the process.
# Some toolchains link the runtime statically (a compiler named by CXX/CUDAHOSTCXX, -static-libstdc++ in
# LDFLAGS). So the shared libraries are named explicitly, ahead of whatever the compiler driver adds: the
# linker binds each reference to the first library that defines it, so a static archive the driver
# appends later contributes nothing. A post-build check fails the build if the result still is not
# dynamically linked.
function(dgemma_use_shared_cxx_runtime target)
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    return()
  endif()
  foreach(lib libstdc++.so libgcc_s.so)
    execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=${lib}
                    OUTPUT_VARIABLE path OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0 OR NOT IS_ABSOLUTE "${path}" OR NOT EXISTS "${path}")
      message(FATAL_ERROR
        "dgemma: the C++ compiler ${CMAKE_CXX_COMPILER} has no shared ${lib} (-print-file-name printed "
        "'${path}'). dgemma._C must use the process's shared C++ runtime (torch's libstdc++.so.6); build with "
        "a compiler that ships one, e.g. CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++.")
    endif()
    message(STATUS "dgemma: C++ runtime ${path}")
    target_link_libraries(${target} PRIVATE "${path}")
  endforeach()
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/check_cxx_runtime.py" "$<TARGET_FILE:${target}>"
    COMMENT "dgemma: checking that ${target} links the shared C++ runtime" VERBATIM)
endfunction()
